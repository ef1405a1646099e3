//! Filesystem watchers: they tell the scanner where to look, never what changed.
//!
//! A watcher's output is a stream of [`Hint`]s: "look at this path" or "rescan everything". The
//! scanner (`crate::scan`) stats and hashes what is hinted and decides what really changed, so a
//! watcher errs on the side of too many hints: a duplicate costs a `stat`, a missed change costs
//! a file that never syncs.
//!
//! Two backends:
//!
//! * [`inotify`] (Linux default): recursive inotify watches, events turned into hints on a
//!   dedicated thread. When the kernel's watch limit runs out, the directories it could not
//!   watch are polled instead.
//! * [`poll`] (Android default, and `--watcher poll` anywhere): every `poll_interval` it hands
//!   the whole tree to the scanner, whose cache is the snapshot the walk is diffed against.
//!
//! Why Android polls: the shared storage apps write to (`/sdcard`, `/storage/emulated/0`) is not
//! a plain filesystem but a FUSE daemon (sdcardfs before Android 11) presenting one lower
//! filesystem through several mount views, one per app or user. An inotify watch sits on the
//! inode of the view ferry opened; writes that reach the same files another way (another app's
//! view, the media provider or MTP writing to the lower filesystem directly, FUSE passthrough)
//! raise no event on it. So an inotify-based sync would silently miss exactly the files a phone
//! user cares about, like the photos the camera app saves. `lstat` sees every writer's result.
//! Polling costs a walk (an `lstat` per entry; a directory is listed only if its ctime moved)
//! per interval; only what moved is read.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

// Compiled everywhere: tests, network mounts, Android.
pub mod poll;
// Linux only: Android polls (see above: /sdcard is FUSE, inotify misses other apps' writes).
#[cfg(target_os = "linux")]
pub mod inotify;

/// What a watcher tells the scanner.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Hint {
    /// Look at this path, relative to the root (may be non-UTF-8). If it is a directory that is
    /// new/moved-in, the scanner walks its whole subtree; if it no longer exists, everything the
    /// scanner knew under it is gone.
    Path(PathBuf),
    /// Events were lost (queue overflow etc.): rescan the whole tree.
    Rescan,
}

/// Which watcher implementation to run.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    Inotify,
    Poll,
}

impl Backend {
    /// The name used on the command line and in logs.
    pub fn name(self) -> &'static str {
        match self {
            Backend::Inotify => "inotify",
            Backend::Poll => "poll",
        }
    }
}

// The compile-time default, one ladder in the style of smol-rs/polling: the first matching arm
// wins, and an OS with no arm is a build error rather than a watcher that silently does nothing.
#[cfg(any(feature = "poll-default", target_os = "android"))]
const DEFAULT_BACKEND: Backend = Backend::Poll;
#[cfg(all(
    not(any(feature = "poll-default", target_os = "android")),
    target_os = "linux"
))]
const DEFAULT_BACKEND: Backend = Backend::Inotify;
#[cfg(not(any(feature = "poll-default", target_os = "android", target_os = "linux")))]
compile_error!(
    "ferry's watchers support Linux and Android; elsewhere build with `--features poll-default`"
);

/// The compile-time default backend: poll on Android or with the `poll-default` feature,
/// inotify on Linux.
pub fn default_backend() -> Backend {
    DEFAULT_BACKEND
}

/// How to watch one synced root.
#[derive(Debug, Clone)]
pub struct WatchConfig {
    pub root: PathBuf,
    pub backend: Backend,
    /// How often the poll backend walks the tree (also used for subtrees inotify cannot watch).
    pub poll_interval: Duration,
}

/// A running watcher; dropping it stops it (best effort: its thread may linger until its next
/// wake-up).
#[derive(Debug)]
pub struct Watcher {
    // Never read: it is held for its `Drop`, which stops the backend's threads.
    _running: Running,
}

#[derive(Debug)]
enum Running {
    Poll(#[allow(dead_code)] poll::PollWatcher),
    #[cfg(target_os = "linux")]
    Inotify(#[allow(dead_code)] inotify::InotifyWatcher),
}

impl Watcher {
    /// Starts watching `cfg.root` recursively, sending hints on `tx` (use `tx.send_blocking` from
    /// its thread). Skips the state directory `<root>/.ferry` entirely (constant
    /// `crate::core::path::STATE_DIR`). Returns once the initial watches are in place, so any
    /// change made after `spawn` returns is reported.
    pub fn spawn(cfg: WatchConfig, tx: async_channel::Sender<Vec<Hint>>) -> io::Result<Watcher> {
        let running = match cfg.backend {
            Backend::Poll => Running::Poll(poll::spawn(&cfg, tx)?),
            Backend::Inotify => spawn_inotify(&cfg, tx)?,
        };
        Ok(Watcher { _running: running })
    }
}

#[cfg(target_os = "linux")]
fn spawn_inotify(cfg: &WatchConfig, tx: async_channel::Sender<Vec<Hint>>) -> io::Result<Running> {
    match inotify::spawn(cfg, tx.clone()) {
        Ok(w) => Ok(Running::Inotify(w)),
        // A root that is not there is the caller's error; anything else (no inotify instances
        // left, watch limit hit on the root itself, a kernel without inotify) is survivable by
        // polling, which sees every change, only later.
        Err(e) if std::fs::metadata(&cfg.root).is_ok_and(|m| m.is_dir()) => {
            log::warn!(
                "cannot watch {} with inotify ({e}); polling it every {:?} instead",
                cfg.root.display(),
                cfg.poll_interval
            );
            Ok(Running::Poll(poll::spawn(cfg, tx)?))
        }
        Err(e) => Err(e),
    }
}

#[cfg(not(target_os = "linux"))]
fn spawn_inotify(cfg: &WatchConfig, tx: async_channel::Sender<Vec<Hint>>) -> io::Result<Running> {
    log::warn!(
        "the inotify watcher exists only on Linux; polling {} every {:?} instead",
        cfg.root.display(),
        cfg.poll_interval
    );
    Ok(Running::Poll(poll::spawn(cfg, tx)?))
}

/// Helpers shared by the backends' tests: a temporary tree, and hint collection with deadlines
/// and sentinels instead of sleeps.
#[cfg(test)]
pub(crate) mod testutil {
    use std::collections::BTreeSet;
    use std::path::{Path, PathBuf};
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::{Duration, Instant};

    use smol::future::FutureExt;

    use super::Hint;

    /// How long any expected hint may take before the test fails.
    const PATIENCE: Duration = Duration::from_secs(10);

    /// A fresh directory under the system temp dir (and a sibling "outside" it), removed on drop.
    pub(crate) struct TempTree {
        pub root: PathBuf,
        pub outside: PathBuf,
    }

    impl TempTree {
        pub(crate) fn new(name: &str) -> TempTree {
            static N: AtomicUsize = AtomicUsize::new(0);
            let base = std::env::temp_dir().join(format!(
                "ferry-watch-{}-{name}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&base);
            let root = base.join("root");
            let outside = base.join("outside");
            std::fs::create_dir_all(&root).unwrap();
            std::fs::create_dir_all(&outside).unwrap();
            TempTree { root, outside }
        }

        pub(crate) fn path(&self, rel: &str) -> PathBuf {
            self.root.join(rel)
        }
    }

    impl Drop for TempTree {
        fn drop(&mut self) {
            if let Some(base) = self.root.parent() {
                let _ = std::fs::remove_dir_all(base);
            }
        }
    }

    /// The receiving end of a watcher, with a way to know it has caught up.
    pub(crate) struct Hints {
        pub rx: async_channel::Receiver<Vec<Hint>>,
        /// The rest of the batch the last `next` took a hint from.
        batch: std::collections::VecDeque<Hint>,
        root: PathBuf,
        syncs: usize,
    }

    impl Hints {
        pub(crate) fn new(rx: async_channel::Receiver<Vec<Hint>>, root: &Path) -> Hints {
            Hints {
                rx,
                batch: Default::default(),
                root: root.to_path_buf(),
                syncs: 0,
            }
        }

        /// The next hint, or `None` if none comes within `timeout`. Panics if the watcher is gone.
        pub(crate) fn next(&mut self, timeout: Duration) -> Option<Hint> {
            if self.batch.is_empty() {
                let batch = self.next_batch(timeout)?;
                self.batch.extend(batch);
            }
            self.batch.pop_front()
        }

        /// The next batch as the watcher sent it (the rest of one `next` took from is dropped),
        /// or `None` if none comes within `timeout`. Panics if the watcher is gone.
        pub(crate) fn next_batch(&mut self, timeout: Duration) -> Option<Vec<Hint>> {
            self.batch.clear();
            let batch = smol::block_on(
                async { Some(self.rx.recv().await.expect("the watcher stopped")) }.or(async {
                    smol::Timer::after(timeout).await;
                    None
                }),
            )?;
            assert!(!batch.is_empty(), "the watcher sent an empty batch");
            Some(batch)
        }

        /// Drops every hint received so far.
        pub(crate) fn drain(&mut self) {
            self.batch.clear();
            while self.rx.try_recv().is_ok() {}
        }

        /// Writes a new sentinel file at the root and collects hints until its own arrives.
        fn sync_once(&mut self, into: &mut BTreeSet<PathBuf>) {
            self.syncs += 1;
            let name = PathBuf::from(format!("sync-{}", self.syncs));
            std::fs::write(self.root.join(&name), b"sync").unwrap();
            let deadline = Instant::now() + PATIENCE;
            loop {
                let left = deadline.saturating_duration_since(Instant::now());
                match self.next(left) {
                    Some(Hint::Path(p)) if p == name => return,
                    Some(Hint::Path(p))
                        if p.file_name().is_some_and(|n| {
                            n.to_str().is_some_and(|n| n.starts_with("sync-"))
                        }) => {}
                    Some(Hint::Path(p)) => {
                        into.insert(p);
                    }
                    // A rescan is "look at everything": recorded as the empty path, which no
                    // assertion on a named path accepts.
                    Some(Hint::Rescan) => {
                        into.insert(PathBuf::new());
                    }
                    None => panic!("no hint for sentinel {name:?} within {PATIENCE:?}"),
                }
            }
        }

        /// Runs `op`, then waits until the watcher has certainly seen it, and returns the paths
        /// hinted meanwhile (sentinels left out). Two sentinels, because a poll walk that was
        /// already under way may report the first sentinel but not `op`; the walk that reports
        /// the second one started after `op` was done.
        pub(crate) fn step(&mut self, op: impl FnOnce()) -> BTreeSet<PathBuf> {
            let mut seen = BTreeSet::new();
            op();
            self.sync_once(&mut seen);
            self.sync_once(&mut seen);
            seen
        }
    }

    /// Asserts `seen` holds every path in `want`.
    #[track_caller]
    pub(crate) fn assert_hinted(seen: &BTreeSet<PathBuf>, want: &[&str]) {
        for w in want {
            assert!(
                seen.contains(Path::new(w)),
                "expected a hint for {w:?}, got {seen:?}"
            );
        }
    }

    /// Asserts no path in `seen` is `prefix` or under it.
    #[track_caller]
    pub(crate) fn assert_none_under(seen: &BTreeSet<PathBuf>, prefix: &str) {
        let bad: Vec<_> = seen.iter().filter(|p| p.starts_with(prefix)).collect();
        assert!(bad.is_empty(), "unexpected hints under {prefix:?}: {bad:?}");
    }

    /// Waits until the watcher's threads are gone: all senders dropped closes the channel.
    pub(crate) fn assert_closes(rx: &async_channel::Receiver<Vec<Hint>>) {
        let closed = smol::block_on(
            async {
                while rx.recv().await.is_ok() {}
                true
            }
            .or(async {
                smol::Timer::after(PATIENCE).await;
                false
            }),
        );
        assert!(closed, "the watcher's thread still runs after drop");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_backend_follows_the_ladder() {
        let want = if cfg!(any(feature = "poll-default", target_os = "android")) {
            Backend::Poll
        } else {
            Backend::Inotify
        };
        assert_eq!(default_backend(), want);
        assert_eq!(Backend::Inotify.name(), "inotify");
        assert_eq!(Backend::Poll.name(), "poll");
    }

    #[test]
    fn spawn_fails_on_a_missing_root() {
        for backend in [Backend::Inotify, Backend::Poll] {
            let (tx, _rx) = async_channel::unbounded();
            let cfg = WatchConfig {
                root: std::env::temp_dir().join("ferry-watch-no-such-root"),
                backend,
                poll_interval: Duration::from_millis(50),
            };
            assert!(Watcher::spawn(cfg, tx).is_err(), "{backend:?}");
        }
    }

    #[test]
    fn both_backends_report_through_watcher() {
        for backend in [Backend::Inotify, Backend::Poll] {
            let t = testutil::TempTree::new(backend.name());
            let (tx, rx) = async_channel::unbounded();
            let cfg = WatchConfig {
                root: t.root.clone(),
                backend,
                poll_interval: Duration::from_millis(50),
            };
            let w = Watcher::spawn(cfg, tx).unwrap();
            let mut hints = testutil::Hints::new(rx, &t.root);
            match backend {
                Backend::Inotify => {
                    let seen = hints.step(|| std::fs::write(t.path("hello"), b"hi").unwrap());
                    testutil::assert_hinted(&seen, &["hello"]);
                }
                // The poll backend hands the whole tree to the scanner every interval.
                Backend::Poll => {
                    assert_eq!(hints.next(Duration::from_secs(10)), Some(Hint::Rescan));
                }
            }
            drop(w);
            testutil::assert_closes(&hints.rx);
        }
    }
}
